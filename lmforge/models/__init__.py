"""Model families, one file each (decoder.py, encoder.py, seq2seq.py, heads.py on the decoder), and
the table of them (registry.py). Nothing is imported here, so importing one family stays cheap."""
