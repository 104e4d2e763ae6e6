"
system	Be brief."
usert5 t6