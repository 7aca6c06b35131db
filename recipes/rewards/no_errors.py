"""The project's source example of a reward, as written there: -1 for a text that mentions an error, 1 otherwise.
gpt2-grpo-no-errors.yaml names it (`rl.rewards: [{function: rewards/no_errors.py:reward_function}]`)."""


def reward_function(text):
    if "error" in text:
        return -1
    return 1
