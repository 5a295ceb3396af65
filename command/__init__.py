"""The `cnnserve` command: the top floor. It imports anything and nothing imports it; it is not shipped in the bento."""
