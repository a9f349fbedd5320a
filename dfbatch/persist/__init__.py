"""What outlives a run: the checkpoint journal (resume after a crash or Ctrl-C) and the run
fingerprint that tells whether a checkpoint belongs to this run.
"""
