"""convsim-mcp: the MCP server and CLI, thin adapters over `engine`."""

__version__ = "0.1.0"
