"""dicomnode.routing"""
