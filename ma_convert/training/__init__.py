"""The library half of the router-finetuning recipe: data, trainable parameters, losses, schedules and the Accelerate loop."""
