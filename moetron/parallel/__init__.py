"""moetron.parallel: the topology (ParallelMesh) and the strategies applied to the plain model from outside."""
