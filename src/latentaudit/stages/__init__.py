"""The audit's stages, in the order a run takes them: behave → directions → latent → tamper
(→ tamper_control). Each is a :class:`~latentaudit.stages.base.Stage`."""
