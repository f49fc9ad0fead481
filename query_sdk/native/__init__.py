"""Native check: a C++ program that searches shards with the stock hnswlib headers."""
