"""``python -m mpimap script.py [args]``: rank 0 runs the script, the other ranks serve it."""

from mpimap._runtime import main

if __name__ == "__main__":
    main()
