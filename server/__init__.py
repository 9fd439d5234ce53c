"""softprompt-server: many tenants' soft prompts on one frozen base model."""

__version__ = "0.1.0"
