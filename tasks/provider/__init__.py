"""The provider side: the OpenAI-compatible client, what its failures mean, and the price table."""
