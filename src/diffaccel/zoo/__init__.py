"""The embedded zoo: the shapes data set, two small trained diffusion models and their evaluator."""
