"""The jobs that are neither an eval protocol (`dinolike.eval.protocols`) nor a curation step
(`dinolike.curation`): training with its final kNN, export, embedding. Each takes its merged config
(or typed arguments) and is called in-process by its command, the pipeline and the Python API."""
