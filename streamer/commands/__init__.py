"""The commands, one module each, above the library: each turns its settings into one run of the block loop
(streamer/stream.py) through one resumable lifecycle (lifecycle.py). main.py parses the command line into them."""
