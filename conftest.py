import os

# Workers are processes; one BLAS/OpenMP thread each keeps 2-core CI machines responsive.
os.environ.setdefault("OMP_NUM_THREADS", "1")
