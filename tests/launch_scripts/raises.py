"""A task raises: the run must fail, with the exception in the job's output."""
import mpimap


def task(x):
    if x == 3:
        raise ValueError(f"boom from item {x}")
    return x


if __name__ == "__main__":
    print(mpimap.pmap(task, range(8)))
    print("NOT REACHED")
