"""Errors that are the user's to fix: the CLI prints their message alone, no traceback."""


class UserError(ValueError):
    """Bad input, config or checkpoint; the message names the file, line or key."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used as asked."""


# what a gs:// workdir, index, store or data path gets until those are read and written natively
GCS_HINT = ("gs:// paths are not read or written directly yet: mount the bucket with gcsfuse (launch/tpu_vm.sh "
            "does with GCS_BUCKET=...) and pass the mounted path")
