"""minigpt's faces: the Textual workbench (`app`) and the `minigpt` CLI (`cli`)."""
