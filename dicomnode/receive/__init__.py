"""dicomnode.receive"""
