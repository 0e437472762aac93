"""lowbit.runtime"""
