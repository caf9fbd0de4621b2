"""Built-in demonstrations (`make chat-demo`, ...): measured end to end, printed next to their anchors."""
