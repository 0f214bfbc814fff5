"""The participant console: a local HTTP application over a participant's home.

An API for the participant's case management system (``/api/v1``, OpenAPI
3.1 from the same pydantic models) and web pages for its staff, served on
the machine that holds the participant's keys (`console.app.create_app`).
"""
