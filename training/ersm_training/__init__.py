"""Training and export of ersm's model packages (see training/README.md).

Run the modules from `training/` as `python3 -m ersm_training.<module>`;
`recipe` rebuilds the shipped package and checks it against it.
"""
