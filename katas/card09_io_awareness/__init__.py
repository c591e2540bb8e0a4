"""card09: IO-awareness: decode attention's arithmetic intensity, and Flash-Decoding's split and merge."""
