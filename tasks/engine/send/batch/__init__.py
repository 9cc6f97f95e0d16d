"""The batch path: request files, the provider's batch records and polling, and writing the results."""
