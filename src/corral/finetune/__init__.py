"""Finetune tasks: dataset validation, the trainer process, and the task manager that queues them."""
