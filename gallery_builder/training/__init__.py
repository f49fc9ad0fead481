"""Training: one fit loop for metric learning, distillation and heads; heads; fusion."""
