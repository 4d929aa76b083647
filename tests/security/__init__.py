"""The security suite: every hostile or broken callback gets a precise answer."""
