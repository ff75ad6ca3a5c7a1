"""Remedies: what to do instead of a hazardous fork, or how to make one harmless.

``context`` picks a multiprocessing start method, ``proxies`` looks the system
proxy configuration up in a helper process, ``sqlite`` refuses to use a
connection inherited across fork. Each is imported only when its public name
is first used (see ``forksafe.__init__``).
"""
