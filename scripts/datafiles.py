"""File helpers shared by the data scripts (fetch_shakespeare.py, fetch_corpus.py): hashing and atomic
writes. Standard library only; imported from the scripts' own directory."""
import hashlib
import os
import tempfile


def log(msg):
    print(msg, flush=True)


def sha256_bytes(b):
    return hashlib.sha256(b).hexdigest()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path, blob):
    """Writes `blob` to `path` through a temporary file in the same directory and a rename: the file is
    complete or absent, and a previous one survives any failure."""
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
