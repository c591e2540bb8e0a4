"""card06: attention mask and position embedding coupling (RoPE and ALiBi with a cache)."""
