"""Coming with its issue; see README "Not yet here"."""
