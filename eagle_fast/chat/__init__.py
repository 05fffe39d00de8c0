"""`python -m eagle_fast.chat`: the terminal chat command (eagle_fast/chat/__main__.py). The chat
API itself is eagle_fast.inference.ChatSession."""
