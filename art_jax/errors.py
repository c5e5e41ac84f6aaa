"""Errors that are the user's to fix: the CLI prints their message alone, no traceback."""


class UserError(ValueError):
    """Bad input, config or checkpoint; the message names the file, line or key."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used as asked."""


# what a gs:// workdir, output or index gets until those are written (and indexes read) natively
GCS_HINT = ("gs:// is read for inputs (models, question files, corpora, stores) but not yet written: mount the "
            "bucket with gcsfuse (launch/tpu_vm.sh does with GCS_BUCKET=...) and pass the mounted path")
