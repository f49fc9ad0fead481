"""Training: the fit loop (metric learning, distillation), transformation heads, fusion."""
