import json

import mpimap

pulled = 0


def gen():
    global pulled
    for i in range(1_000_000):
        pulled += 1
        yield i


seen = 0
worst = 0
total = 0
for r in mpimap.imap(lambda x: x + 1, gen()):
    seen += 1
    total += r
    worst = max(worst, pulled - seen)
print(json.dumps({"seen": seen, "total": total, "worst_read_ahead": worst}))
