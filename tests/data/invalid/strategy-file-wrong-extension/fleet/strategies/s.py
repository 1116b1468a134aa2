print('not a strategy')
