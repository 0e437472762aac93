"""lowbit.convert"""
