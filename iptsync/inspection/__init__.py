"""Tools that show what the rules do, for a person: ``trace`` (a packet's walk through rendered
or live rules), ``explain`` (a service's decisions on this node) and ``diffview`` (what a sync
would change). They read the core's data and never import the agent.
"""
