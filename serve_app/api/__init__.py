"""HTTP request/response shapes (pydantic), apart from the code that serves them."""
