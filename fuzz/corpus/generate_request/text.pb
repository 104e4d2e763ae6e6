
req-1t1 t2 t3(2333?fff?0