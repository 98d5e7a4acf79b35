"""Code shared by every Stipple service: messages, subjects, settings, NATS helpers,
blob stores and the event-sourced task aggregate. Services import only this package."""

__version__ = "0.1.0"
