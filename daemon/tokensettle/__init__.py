"""tokensettle: settle LLM run token counts against the provider's usage records."""

__version__ = "0.1.0"
TOOL_NAME = "tokensettle"
