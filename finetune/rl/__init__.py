"""Reward RL (`train.objective: grpo | rloo`): the recipe section (config), the rewards a recipe names (rewards), the
advantages and losses (objectives) and the Trainer that samples, scores and learns (trainer)."""
