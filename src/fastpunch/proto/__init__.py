"""Sans-IO protocol machines: they take bytes and events and return bytes and
events, never import asyncio, and take time and randomness as arguments."""
