"""dicomnode.assemble"""
