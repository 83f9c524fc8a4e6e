"""On-disk formats: PEFT adapter folders, mttl libraries, fit files and routed models."""
