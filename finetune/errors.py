class UserError(Exception):
    """A problem with the user's recipe, data or arguments: reported in one line, exit status 2."""
