"""Pipeline stages (DESIGN §4): behave → directions → latent → tamper."""
