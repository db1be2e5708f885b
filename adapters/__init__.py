"""Adapters to the outside world: ShareFile and Services Manager over HTTP, and the brokers.

Import the module you need (`adapters.sharefile`, `adapters.services_manager`, `adapters.http`,
`adapters.credentials`, ...): the package itself imports nothing, so using the in-memory broker
does not load httpx and using the HTTP clients does not load pika.
"""
