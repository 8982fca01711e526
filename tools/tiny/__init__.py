"""Training code of ditserve's embedded tiny Wan2.1 model (run it with `python tools/train_tiny.py`).

Kept out of the installed package: the runtime only loads, samples and scores the trained
folder (`ditserve.tiny`). Modules: `arch` (component sizes), `text` (tokenizer and the
training-time prompt encoder), `schedule` (step counts and learning rates), `train_vae`,
`train_dit` (the two stages) and `train` (the command line that runs them in order).
"""
